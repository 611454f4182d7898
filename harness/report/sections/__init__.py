"""One module per section of a report, in the order they appear: overview, protocol groups,
results (with their significance tables), paper comparison, hyper-parameter studies, benchmarks.
Each has one `add` function that appends its blocks to the Document."""
