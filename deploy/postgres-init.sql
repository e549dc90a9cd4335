-- Run once by the postgres image on an empty data directory: the pgvector extension for collections.
CREATE EXTENSION IF NOT EXISTS vector;
