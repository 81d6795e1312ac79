import torch

# Tests run as parallel workers on a 2-core machine: one thread each avoids oversubscription (small convs run
# many times slower when two workers both spawn two threads).
torch.set_num_threads(1)
