"""instructrl: InstructGPT (SFT -> reward model -> PPO-ptx) in JAX and Flax NNX.

The core (losses, model, mesh, sampler, steps) imports without TensorFlow or
seqio; the data layer under `instructrl.data` is the only place they live.
"""

__version__ = "0.1.0"
