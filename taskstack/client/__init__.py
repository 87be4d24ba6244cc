"""The client side: the executor, the pool and the joblib backend over the cluster."""
