"""rlloop: Ray-orchestrated RL actor/learner framework with in-flight vLLM weight updates."""


def launch(overrides=None, recipe: str = "grpo"):
    """Start a run without blocking; see rlloop.handle.launch."""
    from rlloop.handle import launch as _launch

    return _launch(overrides, recipe)
