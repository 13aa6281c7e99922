"""One loss module per method (`kd/losses/<name>.py`); `conf/method/<name>.yaml` names its class with `_target_`.

Nothing here lists the methods: the method configs are the list.
"""
