"""Task YAML files of the lm-eval plugin and their helpers (utils.py); lm-eval reads this
folder through its include path (harness.lm_eval_plugin.TASKS_DIR)."""
