"""How builtin:chat-pool was made from 480 requests written for training (480 -> 404).

Drops every written request close to any builtin:chat prompt (the demo's evaluation prompts):
difflib ratio >= 0.55 on the lowercased text, or a Jaccard overlap >= 0.3 of content words.
    python dedupe.py written.jsonl src/distillspec/data/chat_prompts.jsonl > chat_pool_prompts.jsonl
"""
import difflib
import json
import re
import sys

STOP = set("a an the of to in on and or for is are what how why do does i my me you your it with "
           "about be as that this can at from by whats what's explain write give tell short".split())


def words(text):
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOP and len(w) > 2}


def close(new, old):
    jaccard = len(words(new) & words(old)) / max(1, len(words(new) | words(old)))
    return difflib.SequenceMatcher(None, new.lower(), old.lower()).ratio() >= 0.55 or jaccard >= 0.3


written = [json.loads(line) for line in open(sys.argv[1])]
evaluation = [json.loads(line)["messages"][0]["content"] for line in open(sys.argv[2])]
for record in written:
    if not any(close(record["messages"][0]["content"], old) for old in evaluation):
        print(json.dumps(record))
