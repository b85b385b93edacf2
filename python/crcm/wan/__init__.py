"""The Wan2.1 text-to-video stack (design §2.1), on the components users already have.

- :mod:`crcm.wan.vae`: diffusers' ``AutoencoderKLWan`` as a streaming codec (per-stream causal
  convolution caches, chunk-by-chunk decode, batched across streams).
- :mod:`crcm.wan.text`: the umT5 text encoder and tokenizer of ``transformers``, Wan's 512-token
  rule, an LRU cache of prompt embeddings.
- :mod:`crcm.wan.folder`: a local diffusers Wan2.1 folder and causal student checkpoints
  (safetensors, or ``.pt`` read with ``torch.load(weights_only=True)`` only) as a
  :class:`crcm.Pipeline`.
- :mod:`crcm.wan.tiny`: tiny random Wan folders built offline, for tests and examples.

Nothing here downloads anything: every path is local, and a missing file is a one-line error.
"""
