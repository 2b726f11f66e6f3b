#!/bin/sh
# compose's one-shot MinIO init (the minio-init service runs this file with the root pair): the buckets,
# versioning on the data bucket (an overwritten or deleted object stays recoverable by its version id), and
# one user per least-privilege role with its policy. The policies (policies/<role>.json) are generated from the
# storage-key catalog, pipelines/io/layout.py: `python -m pipelines.devstack.s3_roles infra/minio/policies`
# (add `--data-bucket NAME` for another data bucket). Idempotent: a rerun updates the keys and policies.
set -eu
POLICIES=/leukops-minio/policies
case "$(cat "$POLICIES/serving.json")" in  # the mc image has a shell and coreutils, no grep
  *"arn:aws:s3:::$DATA_BUCKET/"*) ;;
  *) echo "infra/minio/policies do not name the data bucket $DATA_BUCKET: regenerate them (see above)" >&2; exit 1 ;;
esac
mc alias set local "$S3_ENDPOINT" "$S3_ACCESS_KEY" "$S3_SECRET_KEY"
mc mb --ignore-existing "local/$DATA_BUCKET" "local/$ARTIFACTS_BUCKET"
mc version enable "local/$DATA_BUCKET"

provision() {  # role access-key secret-key
  mc admin user add local "$2" "$3"
  mc admin policy create local "leukops-$1" "$POLICIES/$1.json"
  mc admin policy detach local "leukops-$1" --user "$2" >/dev/null 2>&1 || true  # attach fails if attached
  mc admin policy attach local "leukops-$1" --user "$2"
}
provision ingest "$LEUKOPS_S3_ROLES__INGEST__ACCESS_KEY" "$LEUKOPS_S3_ROLES__INGEST__SECRET_KEY"
provision training "$LEUKOPS_S3_ROLES__TRAINING__ACCESS_KEY" "$LEUKOPS_S3_ROLES__TRAINING__SECRET_KEY"
provision drift "$LEUKOPS_S3_ROLES__DRIFT__ACCESS_KEY" "$LEUKOPS_S3_ROLES__DRIFT__SECRET_KEY"
provision serving "$LEUKOPS_S3_ROLES__SERVING__ACCESS_KEY" "$LEUKOPS_S3_ROLES__SERVING__SECRET_KEY"
echo "leukops minio init done"
