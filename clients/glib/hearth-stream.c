/* Streams an answer from hearthd with the gdbus-codegen proxies of org.hearth.Hearth1.xml:
 *
 *     hearth-stream [--address ADDRESS] [--max-tokens N] PROMPT
 *
 * The request object is watched before Generate is called (its path is predictable from a
 * handle_token), so no token is missed; GDBusProxy delivers only signals whose sender owns
 * org.hearth.Hearth1, so another client cannot forge them. Exit status 0 when the answer
 * finished, 1 when hearthd refused or failed it (the error's name on stderr). */
#include <stdio.h>
#include <string.h>

#include "hearth-error.h"
#include "hearth-generated.h"

typedef struct {
  GMainLoop *loop;
  guint tokens;
  gboolean failed;
} Stream;

static void
on_token (HearthHearth1Request *request, guint index, gint token_id, const gchar *text, Stream *s)
{
  (void) request;
  (void) token_id;
  if (index != s->tokens)
    g_printerr ("hearth-stream: token %u out of order\n", index);
  s->tokens++;
  fputs (text, stdout);
  fflush (stdout);
}

static void
on_finished (HearthHearth1Request *request, GVariant *result, Stream *s)
{
  (void) request;
  const gchar *reason = "?", *error_name = NULL, *model = "?";
  g_variant_lookup (result, "finish_reason", "&s", &reason);
  g_variant_lookup (result, "model", "&s", &model);
  if (g_variant_lookup (result, "error_name", "&s", &error_name)) {
    g_printerr ("hearth-stream: the generation failed: %s\n", error_name);
    s->failed = TRUE;
  }
  printf ("\n[%s: %u tokens on %s]\n", reason, s->tokens, model);
  g_main_loop_quit (s->loop);
}

/* The request object path hearthd gives a request with handle_token `token`. */
static gchar *
request_path (GDBusConnection *bus, const gchar *token)
{
  gchar *sender = g_strdup (g_dbus_connection_get_unique_name (bus) + 1);
  for (gchar *c = sender; *c; c++)
    if (!g_ascii_isalnum (*c))
      *c = '_';
  gchar *path = g_strdup_printf ("/org/hearth/Hearth1/request/%s_%s", sender, token);
  g_free (sender);
  return path;
}

int
main (int argc, char **argv)
{
  const gchar *address = NULL;
  gint max_tokens = 64;
  GOptionEntry options[] = {
    { "address", 0, 0, G_OPTION_ARG_STRING, &address, "The bus hearthd is on (default: the system bus)", "ADDRESS" },
    { "max-tokens", 0, 0, G_OPTION_ARG_INT, &max_tokens, "Most tokens of the answer", "N" },
    { NULL },
  };
  g_autoptr (GError) error = NULL;
  g_autoptr (GOptionContext) ctx = g_option_context_new ("PROMPT");
  g_option_context_add_main_entries (ctx, options, NULL);
  if (!g_option_context_parse (ctx, &argc, &argv, &error) || argc != 2) {
    g_printerr ("usage: hearth-stream [--address ADDRESS] [--max-tokens N] PROMPT\n");
    return 2;
  }
  hearth_error_quark (); /* so replies' errors arrive as HEARTH_ERROR codes */

  g_autoptr (GDBusConnection) bus = address
      ? g_dbus_connection_new_for_address_sync (address,
                                                G_DBUS_CONNECTION_FLAGS_AUTHENTICATION_CLIENT
                                                    | G_DBUS_CONNECTION_FLAGS_MESSAGE_BUS_CONNECTION,
                                                NULL, NULL, &error)
      : g_bus_get_sync (G_BUS_TYPE_SYSTEM, NULL, &error);
  if (!bus) {
    g_printerr ("hearth-stream: cannot connect: %s\n", error->message);
    return 1;
  }
  g_autoptr (HearthHearth1) hearth = hearth_hearth1_proxy_new_sync (
      bus, G_DBUS_PROXY_FLAGS_DO_NOT_AUTO_START, "org.hearth.Hearth1", "/org/hearth/Hearth1", NULL, &error);
  if (!hearth) {
    g_printerr ("hearth-stream: %s\n", error->message);
    return 1;
  }

  g_autofree gchar *path = request_path (bus, "glib1");
  g_autoptr (HearthHearth1Request) request = hearth_hearth1_request_proxy_new_sync (
      bus, G_DBUS_PROXY_FLAGS_DO_NOT_LOAD_PROPERTIES, "org.hearth.Hearth1", path, NULL, &error);
  if (!request) {
    g_printerr ("hearth-stream: %s\n", error->message);
    return 1;
  }
  Stream s = { g_main_loop_new (NULL, FALSE), 0, FALSE };
  g_signal_connect (request, "token", G_CALLBACK (on_token), &s);
  g_signal_connect (request, "finished", G_CALLBACK (on_finished), &s);

  GVariantBuilder message;
  g_variant_builder_init (&message, G_VARIANT_TYPE ("a{sv}"));
  g_variant_builder_add (&message, "{sv}", "role", g_variant_new_string ("user"));
  g_variant_builder_add (&message, "{sv}", "content", g_variant_new_string (argv[1]));
  GVariantBuilder messages;
  g_variant_builder_init (&messages, G_VARIANT_TYPE ("aa{sv}"));
  g_variant_builder_add_value (&messages, g_variant_builder_end (&message));
  GVariantBuilder req;
  g_variant_builder_init (&req, G_VARIANT_TYPE ("a{sv}"));
  g_variant_builder_add (&req, "{sv}", "messages", g_variant_builder_end (&messages));
  g_variant_builder_add (&req, "{sv}", "max_tokens", g_variant_new_uint32 ((guint32) max_tokens));
  g_variant_builder_add (&req, "{sv}", "handle_token", g_variant_new_string ("glib1"));

  g_autofree gchar *handle = NULL;
  if (!hearth_hearth1_call_generate_sync (hearth, g_variant_builder_end (&req), &handle, NULL, &error)) {
    g_autofree gchar *name = g_dbus_error_get_remote_error (error);
    g_dbus_error_strip_remote_error (error);
    const gchar *kind = g_error_matches (error, HEARTH_ERROR, HEARTH_ERROR_INVALID_ARGS) ? " (a bad request)" : "";
    g_printerr ("hearth-stream: refused%s: %s: %s\n", kind, name ? name : "?", error->message);
    g_main_loop_unref (s.loop);
    return 1;
  }
  if (strcmp (handle, path) != 0) {
    g_printerr ("hearth-stream: hearthd returned %s, not %s\n", handle, path);
    return 1;
  }
  g_main_loop_run (s.loop);
  g_main_loop_unref (s.loop);
  return s.failed ? 1 : 0;
}
