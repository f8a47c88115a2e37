from .registry import Task, get_task, task_names

__all__ = ["Task", "get_task", "task_names"]
