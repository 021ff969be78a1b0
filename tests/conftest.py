"""Test-wide settings: one intra-op thread (small shapes run faster, and runs do not fight over cores)."""

import torch

torch.set_num_threads(1)
