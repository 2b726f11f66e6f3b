"""leukops: the library behind the Airflow DAGs, the CLI and the serving app."""
