"""Tasks: what is trained and evaluated. One module per task, one entry per task in `TASKS`.

    from mmjax import tasks
    task = tasks.get_task(config)       # config.task -> its Task object
    tasks.validate(config, num_devices)  # mmjax.config.validate + the task's own checks

A new task: a module with a `Task` subclass (see `mmjax.tasks.base`), and `TASKS["name"] = ThatTask`.
"""

from __future__ import annotations

from mmjax.config import validation
from mmjax.errors import ConfigError
from mmjax.tasks.base import Objective, Task, dummy_batch
from mmjax.tasks.classification import ClassificationTask
from mmjax.tasks.coca import CocaTask
from mmjax.tasks.contrastive import ContrastiveTask
from mmjax.tasks.flamingo import FlamingoTask
from mmjax.tasks.itm_mlm import ItmMlmTask
from mmjax.tasks.mdm import MdmTask
from mmjax.tasks.prefix_lm import PrefixLMTask
from mmjax.tasks.text_to_image import TextToImageTask
from mmjax.tasks.vq import VQTask

# config.task -> the Task class that owns it.
TASKS: dict[str, type[Task]] = {
    "contrastive": ContrastiveTask,
    "classification": ClassificationTask,
    "coca": CocaTask,
    "itm_mlm": ItmMlmTask,
    "flamingo": FlamingoTask,
    "mdm": MdmTask,
    "prefix_lm": PrefixLMTask,
    "text_to_image": TextToImageTask,
    "vq": VQTask,
}


def get_task(config) -> Task:
    """The Task of `config.task`; ConfigError naming the known tasks for an unknown one."""
    name = config.get("task", "contrastive")
    if name not in TASKS:
        raise ConfigError([f"task: unknown task {name!r}; choose one of {tuple(TASKS)}"])
    return TASKS[name]()


def validate(config, num_devices: int, process_count: int = 1) -> tuple[int, ...]:
    """`mmjax.config.validate` and the task's own `config_problems`, reported together. Returns the mesh shape."""
    problems, mesh_shape = [], None
    try:
        mesh_shape = validation.validate(config, num_devices, process_count)
    except ConfigError as e:
        problems += e.problems
    try:
        task = get_task(config)
        problems += task.config_problems(config)
        if config.data.get("codes_dir") and "codes" not in task.inputs(config):
            problems.append(f"data.codes_dir={config.data.codes_dir!r}: task {task.name!r} reads images, not "
                            f"pre-tokenised codes (task 'text_to_image' does)")
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return mesh_shape


__all__ = ["TASKS", "Objective", "Task", "dummy_batch", "get_task", "make_objective", "validate"]


def make_objective(config, mesh):
    """The objective of `config.task` on `mesh` (`get_task(config).objective(config, mesh)`)."""
    return get_task(config).objective(config, mesh)
