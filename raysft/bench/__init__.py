"""Side-by-side training benchmark: the seed's worked example, TRL's SFTTrainer and raysft.

``python -m raysft.bench --preset cpu`` (or ``gpu``; ``--dry-run`` prints the plan and builds each
model on the meta device). Every contender trains the same model on the same generated rows with
the same micro-batch, max length and steps, each in a fresh subprocess so peak memory does not
mix; held-out loss is computed by one function for all. Layout:

- ``data.py``: deterministic Alpaca-style rows, the seed's prompt format, tokenized eval examples
- ``presets.py``: the cpu / gpu presets (shapes, contenders, steps) and the dry run
- ``measure.py``: timing, real-token counting, peak memory, MFU, machine and versions
- ``contenders.py``: one training function per contender family (seed, trl, raysft)
- ``child.py``: the subprocess entry that runs one contender and writes its JSON
- ``report.py``: the table, results JSON and the dated section appended to RESULTS.md
- ``ab.py``: ``python -m raysft.bench.ab``, raysft step variants interleaved in one process (for
  comparing choices on a machine shared with other work)
"""
