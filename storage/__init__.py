"""Object stores, the Redis job store, the Job model and the error codes shared by API and worker."""
