"""Go/no-go, step 2: greedy SD rounds walked exactly along gonogo_rows.py's answers, for trees
of the draft's ranks with and without switching to prompt lookup (n-gram suffix n_min..n_max,
K tokens) wherever one matches; predicted speed from the demo's measured c and verify curve.

    python gonogo_sim.py                      (reads /tmp/ng/rows.json)
"""

import json

from distillspec.decoding.tree import best_first

COST_RATIO = 0.096  # the demo's measured draft step / target step (demo-xeon-4's report.json)
VERIFY = {1: 1.0, 2: .98, 3: .99, 4: 1.07, 5: 1.07, 6: 1.07, 7: 1.10, 8: 1.06, 9: 1.11,
          10: 1.17, 11: 1.16, 12: 1.16, 13: 1.16, 14: 1.14, 15: 1.16, 16: 1.17}  # its curve


def verify_cost(tokens):
    return VERIFY.get(tokens, 1.17 + 0.01 * (tokens - 16))


def ngram(context, shortest, longest, count):
    """The tokens after the latest earlier occurrence of the longest matching suffix."""
    for n in range(longest, shortest - 1, -1):
        if len(context) <= n:
            continue
        suffix = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == suffix:
                return context[start + n:start + n + count]
    return []


def tree_accept(paths, draft_top, target, m, last):
    """Greedy tree acceptance: follow the target's tokens through the draft's ranks."""
    accepted, path = 0, ()
    while m + accepted <= last:
        ranks = draft_top[m + accepted]
        if target[m + accepted] not in ranks:
            break
        child = path + (ranks.index(target[m + accepted]),)
        if child not in paths:
            break
        path, accepted = child, accepted + 1
    return accepted


def walk(rows, paths, depth, lookup):
    """(tau, predicted speed-up) over every row's rounds."""
    tokens = rounds = cost = 0.0
    for row in rows:
        ids, first, last = row["ids"], row["first"], row["last"]
        draft_top, target = row["draft"], row["target"]
        m, catch_up = first + 1, 0
        while m <= last:
            copied = ngram(ids[row["start"]:m + 1], *lookup) if lookup else []
            if copied:
                accepted = 0
                while (accepted < len(copied) and m + accepted <= last
                       and copied[accepted] == target[m + accepted]):
                    accepted += 1
                cost += verify_cost(len(copied) + 1)
                catch_up += accepted + 1  # the draft reads these in its next block
            else:
                accepted = tree_accept(paths, draft_top, target, m, last)
                cost += (COST_RATIO * depth * (1 + 0.05 * catch_up)
                         + verify_cost(len(paths) + 1))
                catch_up = 0
            tokens += min(accepted + 1, last + 1 - m)
            rounds += 1
            m += accepted + 1
    return tokens / rounds, tokens / cost


def main():
    with open("/tmp/ng/rows.json") as handle:
        rows = json.load(handle)
    for split, split_rows in rows.items():
        print(split)
        for nodes, depth in [(1, 1), (3, 1), (4, 1), (8, 2), (15, 2)]:
            paths = set(best_first(nodes, depth).paths)
            tau, base = walk(split_rows, paths, depth, None)
            gains = [f"{look}: {walk(split_rows, paths, depth, look)[1] / base:.3f}"
                     for look in [(2, 4, 5), (3, 4, 5), (1, 4, 5), (2, 4, 8), (2, 3, 3)]]
            print(f"  tree {nodes}:{depth}: tau {tau:.2f}, predicted {base:.3f}x |",
                  " | ".join(gains))


if __name__ == "__main__":
    main()
