"""llava_jax.datagen: GPT-assisted instruction data, as in the paper (captions + boxes -> 3 response kinds).

Modules (each a command where it says so):
  client        OpenAI-compatible chat client: concurrency, retries with backoff + jitter, RPM/TPM
                limits, usage and cost (`ChatClient`, `ClientConfig`); depends only on httpx
  context       COCO / JSON Lines annotations -> the symbolic context (captions, normalized boxes)
  prompts       prompt folders (system message + few-shot pairs per kind); vendored default
  rawlog        the append-only, resumable raw response log
  generate      python -m llava_jax.datagen.generate   annotations -> raw responses
  parse         responses -> turns, or a named reject reason
  build         python -m llava_jax.datagen.build      raw responses -> LLaVA JSON (+ rejects, stats)
  captions      python -m llava_jax.datagen.captions   (image, caption) pairs -> stage-1 conversations
  instructions  the paper's brief (11) and detailed (16) description instructions
"""
