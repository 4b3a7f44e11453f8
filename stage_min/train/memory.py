def plan_text(cfg):
    raise NotImplementedError
