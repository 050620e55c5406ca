/*
 * ota's subscription guard: a Mosquitto 2.0 plugin (plugin API v5).
 *
 * Mosquitto's acl_file filters delivery but grants every SUBSCRIBE, so a
 * device could join the control plane's shared subscription
 * ($share/ota-ingest/<root>/devices/+/events) and take a share of every
 * device's events, which the broker then drops at delivery. This plugin
 * decides SUBSCRIBE before the acl_file does:
 *
 *   - a control-plane user (listed in the control users file) is deferred
 *     to the acl_file, which grants it the whole topic root;
 *   - any other user is a device, and may subscribe to exactly one filter,
 *     <topic_root>/devices/<its username>/desired; every other filter
 *     ($share/..., wildcards, other devices' topics, its own events and
 *     state, $SYS) is refused, which an MQTT 5 client sees as SUBACK 0x87.
 *
 * Each check is a string comparison against the username: no per-device
 * state, so registering devices costs the broker nothing here. Every other
 * access (publish, delivery, unsubscribe) is deferred to the acl_file.
 *
 * Revocation: a control-plane user publishes device ids, one a line, to
 * <topic_root>/control/revoked. The guard drops each one's connection at
 * once (the broker has no other way to end a session whose certificate is
 * still valid: a CRL reload refuses new handshakes only) and from then on
 * refuses every access of that username, kicking it again on its first
 * attempt, until a control-plane user names it on
 * <topic_root>/control/restored. The list is kept in memory; the control
 * plane names every revoked device again whenever it connects, so a
 * restarted broker learns it back within seconds.
 *
 * Options (mosquitto.conf):
 *   plugin_opt_topic_root          the ota topic root, e.g. ota/v1
 *   plugin_opt_control_users_file  one control-plane username a line;
 *                                  re-read when the broker reloads (SIGHUP)
 *
 * Built by `ota broker-config` (ota/broker/guard.py) with the system C
 * compiler against the headers of Debian's mosquitto-dev and
 * libmosquitto-dev packages.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define GUARD "ota subscription guard"
#define MAX_LINE 512
#define DENIED_BUCKETS 65536u
#define MAX_PENDING_KICKS 1024u

struct denied {
	struct denied *next;
	char name[];
};

struct guard {
	mosquitto_plugin_id_t *id;
	char *topic_root;
	size_t topic_root_len;
	char *users_file;
	char **users; /* control-plane usernames */
	size_t user_count;
	char *revoked_topic;
	char *restored_topic;
	struct denied **denied; /* revoked usernames, a chained hash set */
	size_t denied_count;
	/* Usernames refused since the last tick, to disconnect from the main loop
	 * (not from inside their own ACL check). */
	char *pending[MAX_PENDING_KICKS];
	size_t pending_count;
};

static unsigned long hash_name(const char *name, size_t len)
{
	unsigned long h = 2166136261u; /* FNV-1a */
	size_t i;
	for(i = 0; i < len; i++){
		h = (h ^ (unsigned char)name[i]) * 16777619u;
	}
	return h % DENIED_BUCKETS;
}

static struct denied **find_denied(struct guard *g, const char *name, size_t len)
{
	struct denied **slot = &g->denied[hash_name(name, len)];
	while(*slot){
		if(strlen((*slot)->name) == len && !memcmp((*slot)->name, name, len)) return slot;
		slot = &(*slot)->next;
	}
	return slot;
}

static bool is_denied(struct guard *g, const char *name)
{
	return g->denied_count > 0 && *find_denied(g, name, strlen(name)) != NULL;
}

static void free_denied(struct guard *g)
{
	size_t i;
	struct denied *d, *next;
	if(!g->denied) return;
	for(i = 0; i < DENIED_BUCKETS; i++){
		for(d = g->denied[i]; d; d = next){
			next = d->next;
			free(d);
		}
	}
	free(g->denied);
}

static void free_users(char **users, size_t count)
{
	size_t i;
	for(i = 0; i < count; i++){
		free(users[i]);
	}
	free(users);
}

/* Reads the control users file into *out; 0 on success, -1 (logged) if not. */
static int read_users(const char *path, char ***out, size_t *out_count)
{
	FILE *f;
	char line[MAX_LINE];
	char **users = NULL, **grown;
	size_t count = 0, cap = 0, len;
	char *start;

	f = fopen(path, "r");
	if(!f){
		mosquitto_log_printf(MOSQ_LOG_ERR, GUARD ": cannot read %s: %s", path, strerror(errno));
		return -1;
	}
	while(fgets(line, sizeof(line), f)){
		len = strlen(line);
		if(len == sizeof(line) - 1 && line[len - 1] != '\n'){
			mosquitto_log_printf(MOSQ_LOG_ERR, GUARD ": line too long in %s", path);
			fclose(f);
			free_users(users, count);
			return -1;
		}
		while(len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'
					|| line[len - 1] == ' ' || line[len - 1] == '\t')){
			line[--len] = '\0';
		}
		start = line;
		while(*start == ' ' || *start == '\t') start++;
		if(*start == '\0' || *start == '#') continue;
		if(count == cap){
			cap = cap ? cap * 2 : 8;
			grown = realloc(users, cap * sizeof(char *));
			if(!grown){
				fclose(f);
				free_users(users, count);
				return -1;
			}
			users = grown;
		}
		users[count] = strdup(start);
		if(!users[count]){
			fclose(f);
			free_users(users, count);
			return -1;
		}
		count++;
	}
	fclose(f);
	*out = users;
	*out_count = count;
	return 0;
}

static bool is_control_user(const struct guard *g, const char *username)
{
	size_t i;
	for(i = 0; i < g->user_count; i++){
		if(!strcmp(g->users[i], username)) return true;
	}
	return false;
}

/* True if `topic` is exactly <topic_root>/devices/<username>/desired. */
static bool is_own_desired(const struct guard *g, const char *username, const char *topic)
{
	static const char devices[] = "/devices/";
	static const char desired[] = "/desired";
	size_t ulen = strlen(username);

	/* A username holding a wildcard or a level separator would turn the
	 * "own topic" into a pattern; such a user gets nothing. */
	if(ulen == 0 || strpbrk(username, "/+#") != NULL) return false;

	if(strncmp(topic, g->topic_root, g->topic_root_len)) return false;
	topic += g->topic_root_len;
	if(strncmp(topic, devices, sizeof(devices) - 1)) return false;
	topic += sizeof(devices) - 1;
	if(strncmp(topic, username, ulen)) return false;
	topic += ulen;
	return !strcmp(topic, desired);
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	struct guard *g = userdata;
	const char *username;

	(void)event;
	username = mosquitto_client_username(ed->client);
	if(username != NULL && is_denied(g, username)){
		/* A revoked device that is still (or again) connected. */
		if(g->pending_count < MAX_PENDING_KICKS){
			g->pending[g->pending_count] = strdup(username);
			if(g->pending[g->pending_count]) g->pending_count++;
		}
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access != MOSQ_ACL_SUBSCRIBE) return MOSQ_ERR_PLUGIN_DEFER;

	if(username == NULL) return MOSQ_ERR_ACL_DENIED;
	if(is_control_user(g, username)) return MOSQ_ERR_PLUGIN_DEFER;
	if(is_own_desired(g, username, ed->topic)){
		/* The acl_file still has its say (it grants read on this topic). */
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE, GUARD ": refused %s's subscription to %s",
			username, ed->topic);
	return MOSQ_ERR_ACL_DENIED;
}

/* Applies one line of a revoked/restored message; returns true if it named a user. */
static bool apply_name(struct guard *g, const char *name, size_t len, bool revoke)
{
	struct denied **slot, *d;
	char id[MAX_LINE];

	if(len == 0 || len >= sizeof(id)) return false;
	slot = find_denied(g, name, len);
	if(revoke){
		if(*slot == NULL){
			d = malloc(sizeof(*d) + len + 1);
			if(!d) return false;
			d->next = NULL;
			memcpy(d->name, name, len);
			d->name[len] = '\0';
			*slot = d;
			g->denied_count++;
		}
		/* Username = client id on every ota listener (use_username_as_clientid). */
		memcpy(id, name, len);
		id[len] = '\0';
		mosquitto_kick_client_by_clientid(id, false);
	}else if(*slot != NULL){
		d = *slot;
		*slot = d->next;
		free(d);
		g->denied_count--;
	}
	return true;
}

static int on_message(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_message *ed = event_data;
	struct guard *g = userdata;
	const char *username, *p, *end, *nl;
	bool revoke;
	unsigned long applied = 0;

	(void)event;
	if(!strcmp(ed->topic, g->revoked_topic)){
		revoke = true;
	}else if(!strcmp(ed->topic, g->restored_topic)){
		revoke = false;
	}else{
		return MOSQ_ERR_SUCCESS;
	}
	username = mosquitto_client_username(ed->client);
	/* The acl_file lets only control users publish here; check anyway. */
	if(username == NULL || !is_control_user(g, username)) return MOSQ_ERR_ACL_DENIED;
	p = ed->payload;
	end = p + ed->payloadlen;
	while(p < end){
		nl = memchr(p, '\n', (size_t)(end - p));
		if(!nl) nl = end;
		if(apply_name(g, p, (size_t)(nl - p), revoke)) applied++;
		p = nl + 1;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE, GUARD ": %s %lu device(s); %lu revoked in all",
			revoke ? "revoked" : "restored", applied, (unsigned long)g->denied_count);
	return MOSQ_ERR_SUCCESS;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	struct guard *g = userdata;
	size_t i;

	(void)event;
	(void)event_data;
	for(i = 0; i < g->pending_count; i++){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, GUARD ": disconnected revoked %s", g->pending[i]);
		mosquitto_kick_client_by_clientid(g->pending[i], false);
		free(g->pending[i]);
	}
	g->pending_count = 0;
	return MOSQ_ERR_SUCCESS;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	struct guard *g = userdata;
	char **users;
	size_t count;

	(void)event;
	(void)event_data;
	if(read_users(g->users_file, &users, &count)){
		/* Keep the list we have: failing here would abort the broker's
		 * whole security reload, passwords and ACL included. */
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				GUARD ": kept the previous control users after a failed reload");
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	free_users(g->users, g->user_count);
	g->users = users;
	g->user_count = count;
	mosquitto_log_printf(MOSQ_LOG_INFO, GUARD ": %lu control user(s) from %s",
			(unsigned long)count, g->users_file);
	return MOSQ_ERR_PLUGIN_DEFER;
}

static void guard_free(struct guard *g)
{
	size_t i;
	if(!g) return;
	for(i = 0; i < g->pending_count; i++) free(g->pending[i]);
	free_denied(g);
	free(g->revoked_topic);
	free(g->restored_topic);
	free_users(g->users, g->user_count);
	free(g->topic_root);
	free(g->users_file);
	free(g);
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	(void)supported_version_count;
	(void)supported_versions;
	return 5;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	struct guard *g;
	const char *root = NULL, *file = NULL;
	int i;

	for(i = 0; i < option_count; i++){
		if(!strcmp(options[i].key, "topic_root")){
			root = options[i].value;
		}else if(!strcmp(options[i].key, "control_users_file")){
			file = options[i].value;
		}
	}
	if(!root || !root[0] || !file || !file[0]){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				GUARD ": needs plugin_opt_topic_root and plugin_opt_control_users_file");
		return MOSQ_ERR_INVAL;
	}
	g = calloc(1, sizeof(*g));
	if(!g) return MOSQ_ERR_NOMEM;
	g->id = identifier;
	g->topic_root = strdup(root);
	g->users_file = strdup(file);
	if(!g->topic_root || !g->users_file){
		guard_free(g);
		return MOSQ_ERR_NOMEM;
	}
	g->topic_root_len = strlen(g->topic_root);
	g->revoked_topic = malloc(g->topic_root_len + sizeof("/control/restored"));
	g->restored_topic = malloc(g->topic_root_len + sizeof("/control/restored"));
	g->denied = calloc(DENIED_BUCKETS, sizeof(*g->denied));
	if(!g->revoked_topic || !g->restored_topic || !g->denied){
		guard_free(g);
		return MOSQ_ERR_NOMEM;
	}
	sprintf(g->revoked_topic, "%s/control/revoked", g->topic_root);
	sprintf(g->restored_topic, "%s/control/restored", g->topic_root);
	/* Fail closed: a broker that cannot tell the control plane from a
	 * device does not start. */
	if(read_users(g->users_file, &g->users, &g->user_count)){
		guard_free(g);
		return MOSQ_ERR_INVAL;
	}
	if(mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, g)
			|| mosquitto_callback_register(identifier, MOSQ_EVT_RELOAD, on_reload, NULL, g)
			|| mosquitto_callback_register(identifier, MOSQ_EVT_MESSAGE, on_message, NULL, g)
			|| mosquitto_callback_register(identifier, MOSQ_EVT_TICK, on_tick, NULL, g)){
		mosquitto_callback_unregister(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
		mosquitto_callback_unregister(identifier, MOSQ_EVT_RELOAD, on_reload, NULL);
		mosquitto_callback_unregister(identifier, MOSQ_EVT_MESSAGE, on_message, NULL);
		guard_free(g);
		return MOSQ_ERR_UNKNOWN;
	}
	*userdata = g;
	mosquitto_log_printf(MOSQ_LOG_INFO,
			GUARD ": devices may subscribe only to %s/devices/<username>/desired; "
			"%lu control user(s) from %s",
			g->topic_root, (unsigned long)g->user_count, g->users_file);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	struct guard *g = userdata;

	(void)options;
	(void)option_count;
	if(g){
		mosquitto_callback_unregister(g->id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
		mosquitto_callback_unregister(g->id, MOSQ_EVT_RELOAD, on_reload, NULL);
		mosquitto_callback_unregister(g->id, MOSQ_EVT_MESSAGE, on_message, NULL);
		mosquitto_callback_unregister(g->id, MOSQ_EVT_TICK, on_tick, NULL);
		guard_free(g);
	}
	return MOSQ_ERR_SUCCESS;
}
