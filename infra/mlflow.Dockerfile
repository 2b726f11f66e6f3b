# MLflow tracking server: Postgres backend, S3 artifacts (proxied), basic-auth app (Flask-WTF), non-root.
FROM ghcr.io/mlflow/mlflow:v3.17.2 AS base
RUN pip install --no-cache-dir "psycopg2-binary==2.9.10" "boto3==1.44.8" "Flask-WTF==1.3.0" \
 && useradd --create-home --uid 10002 mlflow \
 && mkdir -p /var/lib/mlflow-auth && chown mlflow /var/lib/mlflow-auth
USER mlflow
EXPOSE 5000
