"""The benchmarks behind `raycpt bench`: `data` (one worker's stream), `checkpoint` (save stall
and persist time), `train` (the real training path next to plain PyTorch loops)."""
