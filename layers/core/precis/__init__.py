"""precis: streaming summarization on AWS serverless."""
