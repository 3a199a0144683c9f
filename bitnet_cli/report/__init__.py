"""Reading runs back for people, without torch: what `status` summarises, the plots, runs
compared side by side, and what a run costs (FLOPs, GPU-hours, memory). Imports config/ and
store/ only, so `status`, `plot`, `compare` and `cost` answer instantly."""
