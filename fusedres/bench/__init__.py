"""The benchmark CLI (`fusedres-bench`, `python -m fusedres.bench`): the project's main job.

Builds a torchvision ResNet, the baselines (eager NCHW fp32, eager channels_last in the
chosen dtype, torch.compile default and max-autotune, cuDNN's per-conv fusion after BN
folding) and one fusedres candidate per backend; checks every candidate against an fp32
reference before timing it; times them interleaved in one process; prints a table and
writes JSON (every raw number and the environment) and a PNG chart.
"""
