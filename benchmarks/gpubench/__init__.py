"""The GPU benchmark behind ``python benchmarks/gpu.py`` (``benchmarks/README.md`` explains every figure).

One module per job, all timed by ``timing.time_ms`` through ``Run.time``:

- ``cli``: the command line and the order of the sections;
- ``report``: ``Run``, the settings, results and errors of one run, and the JSON file it rewrites;
- ``device``: the device's name, peak DRAM bandwidth and the bandwidth figures;
- ``backends``: which backend each op runs on, and one backend's implementation of an op;
- ``timing``: the timer, and the forward or backward step that it times;
- ``checks``: a backend's result against the reference or baseline, with its threshold;
- ``scan``, ``fusion``, ``observation``, ``models``, ``profiling``: the sections;
- ``targets``: the performance targets, judged with their thresholds;
- ``table``: the table printed at the end.
"""
