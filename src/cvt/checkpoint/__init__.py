"""Checkpoint formats (placeholder until the checkpoint module lands)."""


def checkpoint_filter_fn(state_dict, model):
    return state_dict
