"""Tools around the pipeline: the TPU planner (`aot`), multi-process start-up
(`distributed`), Hugging Face checkpoints (`hf`) and the stage probe (`probe`).

Layer 4: may import anything below; nothing below imports it.
"""
