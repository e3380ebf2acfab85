//! `storage.objects` and `storage.buckets`, kept in a PostgreSQL database the way the real
//! Supabase Storage server keeps them in the project's database: a row per object, written when
//! the object is uploaded and deleted when the object is. The project's own queries (and
//! pg_orphan_cleanup's) then see what a Supabase database holds.
//!
//! The tables are created when missing, with the real server's columns (v1.70.6, see
//! `shared/notes/supabase-storage-api.md`), and the trigger that refuses a direct
//! `DELETE FROM storage.objects` unless the session sets `storage.allow_delete_query`, as the
//! server does for its own deletes.

use serde_json::json;
use tokio_postgres::{Client, NoTls};

use crate::store::ObjectMeta;

/// The real server's tables, and its guard against direct deletes.
const SCHEMA: &str = r#"
CREATE SCHEMA IF NOT EXISTS storage;
CREATE TABLE IF NOT EXISTS storage.buckets (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    owner      uuid,
    owner_id   text,
    public     boolean DEFAULT false,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now()
);
CREATE TABLE IF NOT EXISTS storage.objects (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    bucket_id        text REFERENCES storage.buckets (id),
    name             text,
    owner            uuid,
    owner_id         text,
    created_at       timestamptz DEFAULT now(),
    updated_at       timestamptz DEFAULT now(),
    last_accessed_at timestamptz DEFAULT now(),
    metadata         jsonb,
    user_metadata    jsonb,
    path_tokens      text[] GENERATED ALWAYS AS (string_to_array(name, '/')) STORED,
    version          text,
    archived_at      timestamptz,
    is_delete_marker boolean NOT NULL DEFAULT false,
    is_versioned     boolean NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX IF NOT EXISTS bucketid_objname ON storage.objects (bucket_id, name);
CREATE INDEX IF NOT EXISTS name_prefix_search ON storage.objects (name text_pattern_ops);
CREATE OR REPLACE FUNCTION storage.protect_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('storage.allow_delete_query', true), 'false') <> 'true' THEN
        RAISE EXCEPTION 'Direct deletion from storage tables is not allowed. Use the Storage API instead.'
            USING ERRCODE = '42501';
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS protect_objects_delete ON storage.objects;
CREATE TRIGGER protect_objects_delete BEFORE DELETE ON storage.objects
    FOR EACH STATEMENT EXECUTE FUNCTION storage.protect_delete();
"#;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot connect to the database for storage.objects: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("storage.objects: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// A connection to the database whose `storage` schema mirrors the store.
pub struct Catalog {
    client: Client,
}

impl Catalog {
    /// Connects, and creates the tables when missing. The connection string is libpq's
    /// (`host=... dbname=...` or a URL); the tests' and the demo's clusters take no TLS.
    pub async fn open(url: &str) -> Result<Catalog, CatalogError> {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(CatalogError::Connect)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::error!(error = %e, "the storage.objects connection ended");
            }
        });
        client.batch_execute(SCHEMA).await?;
        Ok(Catalog { client })
    }

    /// A bucket's row, as the server writes it when the bucket is created.
    pub async fn bucket(&self, name: &str, public: bool) -> Result<(), CatalogError> {
        self.client
            .execute(
                "INSERT INTO storage.buckets (id, name, public) VALUES ($1, $1, $2)
                 ON CONFLICT (id) DO UPDATE SET public = EXCLUDED.public, updated_at = now()",
                &[&name, &public],
            )
            .await?;
        Ok(())
    }

    /// An object's row, written (or rewritten, for an upsert) as the server writes it.
    pub async fn put(
        &self,
        bucket: &str,
        name: &str,
        meta: &ObjectMeta,
    ) -> Result<(), CatalogError> {
        self.client
            .execute(
                "INSERT INTO storage.objects (id, bucket_id, name, metadata, version, created_at, updated_at, last_accessed_at)
                 VALUES ($1::text::uuid, $2, $3, $4::text::jsonb, gen_random_uuid()::text,
                         $5::text::timestamptz, $5::text::timestamptz, $5::text::timestamptz)
                 ON CONFLICT (bucket_id, name) DO UPDATE
                    SET id = EXCLUDED.id, metadata = EXCLUDED.metadata, version = EXCLUDED.version,
                        updated_at = EXCLUDED.updated_at, last_accessed_at = EXCLUDED.last_accessed_at",
                &[&meta.id.to_string(), &bucket, &name, &metadata(meta), &meta.created_at],
            )
            .await?;
        Ok(())
    }

    /// Deletes the rows of objects the store deleted, in one transaction that allows it.
    pub async fn delete(&self, bucket: &str, names: &[String]) -> Result<(), CatalogError> {
        if names.is_empty() {
            return Ok(());
        }
        self.deleting(
            "DELETE FROM storage.objects WHERE bucket_id = $1 AND name = ANY ($2)",
            &[&bucket, &names],
        )
        .await
    }

    /// Runs one DELETE with the server's permission to delete set for its transaction.
    async fn deleting(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<(), CatalogError> {
        self.client
            .batch_execute("BEGIN; SET LOCAL storage.allow_delete_query = 'true'")
            .await?;
        match self.client.execute(sql, params).await {
            Ok(_) => self.client.batch_execute("COMMIT").await?,
            Err(e) => {
                let _ = self.client.batch_execute("ROLLBACK").await;
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Makes the tables hold exactly what the store holds, when it opens (objects seeded
    /// straight into the data directory, or a database kept from an earlier run): rows for what
    /// they lack, in batches, and none for objects of these buckets the store does not hold.
    pub async fn sync(
        &self,
        buckets: &[(String, bool)],
        objects: &[(String, String, ObjectMeta)],
    ) -> Result<(), CatalogError> {
        for (name, public) in buckets {
            self.bucket(name, *public).await?;
        }
        for chunk in objects.chunks(10_000) {
            let ids: Vec<String> = chunk.iter().map(|(_, _, m)| m.id.to_string()).collect();
            let bs: Vec<&str> = chunk.iter().map(|(b, _, _)| b.as_str()).collect();
            let ns: Vec<&str> = chunk.iter().map(|(_, n, _)| n.as_str()).collect();
            let ms: Vec<String> = chunk.iter().map(|(_, _, m)| metadata(m)).collect();
            let ts: Vec<&str> = chunk
                .iter()
                .map(|(_, _, m)| m.created_at.as_str())
                .collect();
            self.client
                .execute(
                    "INSERT INTO storage.objects (id, bucket_id, name, metadata, version, created_at, updated_at, last_accessed_at)
                     SELECT i::uuid, b, n, m::jsonb, gen_random_uuid()::text, t::timestamptz, t::timestamptz, t::timestamptz
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS x(i, b, n, m, t)
                     ON CONFLICT (bucket_id, name) DO NOTHING",
                    &[&ids, &bs, &ns, &ms, &ts],
                )
                .await?;
        }
        let names: Vec<&str> = buckets.iter().map(|(n, _)| n.as_str()).collect();
        let bs: Vec<&str> = objects.iter().map(|(b, _, _)| b.as_str()).collect();
        let ns: Vec<&str> = objects.iter().map(|(_, n, _)| n.as_str()).collect();
        self.deleting(
            "DELETE FROM storage.objects AS o
             WHERE o.bucket_id = ANY ($1)
               AND NOT EXISTS (SELECT FROM unnest($2::text[], $3::text[]) AS k(b, n)
                               WHERE k.b = o.bucket_id AND k.n = o.name)",
            &[&names, &bs, &ns],
        )
        .await
    }
}

/// An object's `metadata`, as the server writes it.
fn metadata(meta: &ObjectMeta) -> String {
    json!({
        "eTag": format!("\"{}\"", meta.id.simple()),
        "size": meta.size,
        "mimetype": meta.mimetype,
        "cacheControl": "max-age=3600",
        "lastModified": meta.created_at,
        "contentLength": meta.size,
        "httpStatusCode": 200,
    })
    .to_string()
}
