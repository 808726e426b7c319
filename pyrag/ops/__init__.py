"""torch custom ops (torch.library.custom_op("pyrag::...")) over the C++/CUDA kernels. Never imports transformers."""
