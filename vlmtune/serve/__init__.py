"""`vlmtune serve`: an OpenAI-compatible HTTP server over `vlmtune.generation`.

    vlmtune serve runs/latex --adapter coco=runs/coco

`command` (the command line), `app` (FastAPI routes), `requests` (checking a request and its
images), `batching` (the generation thread that batches requests), `vllm_engine` (`--engine vllm`).
"""
