/* Hearth's D-Bus errors as a GError domain: register it once (hearth_error_quark() does, on
 * first use) and every org.hearth.Hearth1.Error.* reply of a GDBus call arrives as
 * HEARTH_ERROR with its code, so callers match codes, not strings:
 *
 *     if (g_error_matches (error, HEARTH_ERROR, HEARTH_ERROR_BUSY)) retry_later ();
 *
 * g_dbus_error_get_remote_error() still gives the name, and
 * g_dbus_error_strip_remote_error() leaves hearthd's message alone. */
#pragma once

#include <gio/gio.h>

G_BEGIN_DECLS

typedef enum {
  HEARTH_ERROR_INVALID_ARGS,
  HEARTH_ERROR_CONTEXT_LENGTH_EXCEEDED,
  HEARTH_ERROR_MODEL_NOT_FOUND,
  HEARTH_ERROR_MODEL_UNAVAILABLE,
  HEARTH_ERROR_BUSY,
  HEARTH_ERROR_CANCELLED,
  HEARTH_ERROR_NOT_AUTHORIZED,
  HEARTH_ERROR_PRIVACY_VIOLATION,
  HEARTH_ERROR_CLOUD_UNAVAILABLE,
  HEARTH_ERROR_ENGINE_FAILED,
  HEARTH_ERROR_INTERNAL,
} HearthError;

#define HEARTH_ERROR (hearth_error_quark ())
GQuark hearth_error_quark (void);

G_END_DECLS
