"""distillgate's router: policies, the route decision, shadow evaluation, scorers and the promotion gate."""
