"""Put on PYTHONPATH by tests that train in fp16 on CPU (Python imports it at start-up).

DeepSpeed's CPU accelerator declines fp16 unless oneDNN has fp16 kernels for this processor
(AVX512-FP16), and CI's does not. PyTorch's CPU operators compute in fp16 all the same, only
slowly, which is all the tests need: they check the loss scaler's bookkeeping, not speed.
"""
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

CPU_Accelerator.is_fp16_supported = lambda self: True
