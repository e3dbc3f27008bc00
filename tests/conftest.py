import os

# Two cores on CI: keep torch from oversubscribing them when DDP starts two processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
