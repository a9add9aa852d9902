"""The second batch of written training requests (issue 20): new-1..4.jsonl -> new-written.jsonl.

Same rule as docs/results/written-prompts/dedupe.py (difflib ratio >= 0.55 on the lowercased
text, or a Jaccard overlap >= 0.3 of content words), applied against every prompt the project
already has or evaluates on (builtin:chat, builtin:chat-pool, the other-source set) and within
the batch (a request close to an earlier kept one is dropped).
    python dedupe2.py OUT NEW... -- OLD...
"""
import difflib
import json
import re
import sys

STOP = set(["a", "an", "the", "of", "to", "in", "on", "and", "or", "for", "is", "are", "what", "how", "why", "do", "does", "i", "my", "me", "you", "your", "it", "with", "about", "be", "as", "that", "this", "can", "at", "from", "by", "whats", "what's", "explain", "write", "give", "tell", "short"])


def words(text):
    return frozenset(w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOP and len(w) > 2)


def close(new, new_words, old, old_words):
    if len(new_words & old_words) / max(1, len(new_words | old_words)) >= 0.3:
        return True
    matcher = difflib.SequenceMatcher(None, new.lower(), old.lower())
    return matcher.real_quick_ratio() >= 0.55 and matcher.quick_ratio() >= 0.55 \
        and matcher.ratio() >= 0.55


def content(path):
    return [json.loads(line)["messages"][0]["content"] for line in open(path)]


out, rest = sys.argv[1], sys.argv[2:]
split = rest.index("--")
new_files, old_files = rest[:split], rest[split + 1:]
kept_against = [(text, words(text)) for path in old_files for text in content(path)]
kept, dropped = [], 0
for path in new_files:
    for line in open(path):
        record = json.loads(line)
        text = record["messages"][0]["content"]
        text_words = words(text)
        if any(close(text, text_words, old, old_words) for old, old_words in kept_against):
            dropped += 1
            continue
        kept.append(record)
        kept_against.append((text, text_words))
with open(out, "w") as handle:
    handle.writelines(json.dumps(record) + "\n" for record in kept)
print(f"kept {len(kept)}, dropped {dropped}", file=sys.stderr)
