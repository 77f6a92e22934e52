"""Runs in a spawned process: receives pickled models, returns their outputs and class names."""


def run_models(cases, queue, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # the parent's: a convolution's rounding depends on how its work is split
    results = []
    with torch.no_grad():
        for model, x in cases:
            # as numpy: sent by value (a shared tensor would need this process alive until the parent reads it)
            results.append((model.eval()(x).numpy(), [type(m).__qualname__ for m in model.modules()]))
    queue.put(results)
