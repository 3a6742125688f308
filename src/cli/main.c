/* main.c: meshgate-cli (being written). */
int main(void)
{
    return 2;
}
