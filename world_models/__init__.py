"""Diffusion world models, uncertainty and imagined rollouts for safe finetuning.

    diffusion.py     EDM conditional diffusion model over the state (delta, reward, termination), sampler, files
    data.py          transitions from sim rollouts of a policy or MCAP recordings; windows of k steps
    train.py         training loop and fidelity metrics (one-step, H-step, failures, uncertainty calibration)
    ensemble.py      the MBPO/MOPO probabilistic ensemble baseline (bench/world_model.py)
    imagined_env.py  the model behind BatchedEnvProtocol, with safety gates (docs/WORLD_MODELS.md)
    finetune.py      safe finetuning (LIFT): deterministic policy on the target, exploration in imagination
"""
