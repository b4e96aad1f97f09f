"""Nothing from the Hub at run time: what libraries would fetch on their own when a local model is used.

Light on purpose (no torch): every command calls :func:`no_hub_kernels` from :func:`core.cli.setup_logging`, before
anything imports peft or bitsandbytes, and :mod:`core.model` calls it on import for library users.
"""

from __future__ import annotations

BNB_HUB_KERNELS = ("kernels-community/quantization-bitsandbytes", "kernels-community/bitsandbytes-mps")
"""The Hub kernel repositories bitsandbytes 0.50 asks for when it is imported (CPU with AVX512-BF16; Apple MPS)."""


def _drop_hub_kernel_warning(record) -> bool:
    return "from kernels-community" not in record.getMessage()


def no_hub_kernels() -> None:
    """Nothing is fetched from the Hub at run time for bitsandbytes.

    On a CPU with AVX512-BF16, ``import bitsandbytes`` (which ``import peft`` does) runs
    ``kernels.get_kernel("kernels-community/quantization-bitsandbytes")`` (``bitsandbytes/backends/cpu/ops.py``): a
    Hub lookup on every run, which then fails the kernels package's publisher-trust check and logs "Failed to load
    CPU gemm_4bit_forward ... Set trust_remote_code=True". bitsandbytes has no flag or environment variable for it;
    on failure it uses its own built-in CPU kernel, which is what the toolkit has always run. So here
    ``kernels.get_kernel`` refuses those repositories (:data:`BNB_HUB_KERNELS`) without a network call, any other
    repository goes through, and bitsandbytes' warning about the refusal is dropped. Must run before ``peft`` /
    ``bitsandbytes`` are imported; idempotent; a no-op without ``kernels``.
    """
    import functools
    import importlib.util
    import logging

    if importlib.util.find_spec("kernels") is None:
        return
    import kernels

    if getattr(kernels.get_kernel, "qlml_offline", False):
        return
    real = kernels.get_kernel

    @functools.wraps(real)
    def get_kernel(repo_id, *args, **kwargs):
        if repo_id in BNB_HUB_KERNELS:
            raise RuntimeError(f"{repo_id}: Hub kernels are not fetched at run time (core.model.no_hub_kernels)")
        return real(repo_id, *args, **kwargs)

    get_kernel.qlml_offline = True
    kernels.get_kernel = get_kernel
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_hub_kernel_warning)

