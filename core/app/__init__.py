"""The application layer, above the engine: the job store and its workers, the CPU split, benchmarks
and experiments, and the command line. The engine (bundle, backends, sampling, erasure, graph,
runs, export) never imports from here."""
