"""The selective linear cross-entropy op, :func:`cggr.functional.linear_cross_entropy`, in its modules.

Shape legend: N = B·T tokens, H hidden size, V vocabulary, K kept tokens, K_max a static bound on K.

- :mod:`cggr.linear_ce.options`: what a caller sets and gets back (:class:`LinearCrossEntropyOptions`,
  :class:`LinearCrossEntropyInfo`, the accumulation mode of the fused kernel, ``head_options`` checks).
- :mod:`cggr.linear_ce.torch_path`: the pure-PyTorch forward and backward (the CPU path and the test oracle).
- :mod:`cggr.linear_ce.plan`: the static settings of one call (:class:`Plan`) and the one place that decides
  which kernel runs and how (:func:`choose_route`).
- :mod:`cggr.linear_ce.autograd`: the autograd Function (scores, selection, loss; the backward of the kept rows).
- :mod:`cggr.linear_ce.op`: the public op (argument checks, then the Function).

:mod:`cggr.functional` is the public entry point and re-exports the public names. Nothing here is imported by a
kernel: the kernels (:mod:`cggr.kernels`) are the lower layer, imported inside the functions that launch them.
This package's ``__init__`` imports nothing, so importing one of its modules loads only what that module needs.
"""
