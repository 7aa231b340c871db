"""Model rollout (deploy.py) and the production inference client (client.py)."""
