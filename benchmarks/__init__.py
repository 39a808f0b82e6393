"""The benchmark scripts, a package run from the repository root: ``python -m benchmarks.<script>``."""
