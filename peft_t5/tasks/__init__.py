from .registry import Task, get_task, task_names, template_fields

__all__ = ["Task", "get_task", "task_names", "template_fields"]
