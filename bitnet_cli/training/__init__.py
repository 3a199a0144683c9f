"""How a run is trained: setting it up (config, data, the run folder, resume checks), the
loop, the optimizer and its schedule, compiling, data parallelism and ternary health. Imports
every folder below it (config, store, report, data, nn, tasks); never use/, ui/ or cli/."""
