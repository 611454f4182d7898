"""The tracking store and everything that crosses it: what is written to MLflow and read back.

- contract: every tag, metric and artifact name and run kind, the one place they are spelled;
- location: where the local store lives (results/);
- writer: `Tracker`, what trainings, studies and benchmarks write through;
- reader: `Store` and `Run`, what the report and a study's progress view read through;
- transfer: `export` into a self-contained store to commit, `import` back into a local one;
- records: the committed store format (a text record per run), loaded into MLflow to be read;
- checkpoints: unfinished runs' checkpoints carried inside an exported store.

Nothing here imports the trainer, the studies or the report: they all import this (see
tests/test_layers.py). The package itself imports nothing, so `contract` stays cheap to import.
"""
