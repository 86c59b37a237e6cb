"""boto3 adapters: they implement the domain's ports and turn ClientError into domain errors."""
