"""The CRM: SQL migrations, queries and row types (plain, parameterised SQL)."""
