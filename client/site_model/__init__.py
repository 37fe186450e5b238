"""The model a site keeps for itself, beside the global one it helps train.

`personal`: a personal model trained at home every round (nothing of it is sent); `final`: at the end,
the site's final model chosen on its own validation records among the global model, pulled and mixed
candidates and a model trained alone, kept from forgetting what the federation knows (`guard`);
`threshold`: the decision threshold the site picks for itself; `report`: what joining gave the site,
alone against global against final on its own test split, with intervals.
"""
