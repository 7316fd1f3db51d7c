"""Data: the embedded tasks, user data sets, chat templates and held-out prose."""
