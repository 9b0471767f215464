"""hbllm's Hydra launcher plugins (Hydra loads plugins only from the ``hydra_plugins``
namespace package, so they live here rather than in ``hbllm``)."""
