"""stunet.kernels: Triton kernels, each registered as a torch.library op beside its reference math."""
