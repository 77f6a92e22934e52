"""Runs in a spawned process: receives a pickled model, returns its output and class names."""


def run_model(model, x, queue) -> None:
    import torch

    with torch.no_grad():
        y = model.eval()(x)
    # as numpy: sent by value (a shared tensor would need this process alive until the parent reads it)
    queue.put((y.numpy(), [type(m).__qualname__ for m in model.modules()]))
